"""Native CPU kernels (XLA FFI custom calls), compiled on the machine that runs them (`build`)."""
