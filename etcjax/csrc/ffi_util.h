// Copyright 2026 The etcjax Authors. Licensed under the Apache License, Version 2.0.
//
// Helpers shared by etcjax's XLA:CPU FFI kernels (etc_cpu.cc, depthwise_cpu.cc): ready and
// failed futures, shapes in error messages, and splitting a call's work over XLA's
// intra-op thread pool.

#ifndef ETCJAX_CSRC_FFI_UTIL_H_
#define ETCJAX_CSRC_FFI_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace etcjax {
namespace ffi_util {

namespace ffi = xla::ffi;

inline ffi::Future ErrorFuture(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(std::move(error));
  return future;
}

inline ffi::Future ReadyFuture() {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetAvailable();
  return future;
}

// "(2, 3)", "(4,)": a shape as Python prints it.
inline std::string Dims(ffi::Span<const int64_t> dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// Runs `run(first, last)` over [0, units) cut into `tasks` contiguous ranges: the calling
// thread runs the first range itself, the pool the others. Nothing waits on a pool task,
// so a busy pool only delays the returned future. `run` is copied into every task (hold
// shared state by shared_ptr).
template <typename Run>
ffi::Future SplitOverPool(ffi::ThreadPool pool, int64_t units, int64_t tasks, Run run) {
  if (tasks <= 1) {
    run(int64_t{0}, units);
    return ReadyFuture();
  }
  ffi::CountDownPromise done(tasks);
  ffi::Future future(done);
  for (int64_t t = tasks - 1; t >= 0; --t) {
    auto task = [run, done, first = units * t / tasks,
                 last = units * (t + 1) / tasks]() mutable {
      run(first, last);
      done.CountDown();
    };
    if (t == 0) {
      task();
    } else {
      pool.Schedule(std::function<void()>(std::move(task)));
    }
  }
  return future;
}

}  // namespace ffi_util
}  // namespace etcjax

#endif  // ETCJAX_CSRC_FFI_UTIL_H_
