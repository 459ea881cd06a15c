"""Triton kernels, each beside its plain-torch reference. Importing this package compiles nothing."""
