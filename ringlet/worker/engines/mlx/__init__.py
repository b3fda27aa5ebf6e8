"""The MLX engine (mlx-lm models; Metal on Apple Silicon, CPU on Linux)."""
