"""Test-session set-up shared by every test module."""

import jax

# Start JAX's CPU client before any test runs. Entry points called in-process (demo.main,
# main.run_from_flags) then leave this process's malloc and dispatch mode as they are:
# etcjax.xla_cpu applies its settings only before JAX starts, so without this the outcome
# would depend on test order. Subprocess tests still get the entry points' real behaviour.
jax.devices()
