"""Pallas kernels for accelerators (GPU via Triton, TPU via Mosaic), CPU-testable in
Pallas interpret mode.

* `depthwise_pallas`: k x k depthwise convolution ("same" padding) with its input and
  kernel gradients, ConvMixer's `depthwise_impl="pallas"`.
* `check`: the kernels against their reference formulations on the current device
  (`python -m etcjax.kernels.check --out check.json`), for a GPU/TPU machine.
"""
