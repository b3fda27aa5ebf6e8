"""Hand-written device kernels of the model layers (Triton), imported lazily by the layers that use them."""
