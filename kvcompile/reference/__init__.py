"""Plain PyTorch references, written from the papers: slow, explicit, and used to define correctness."""
