"""Hallo compatible video: face / landmark encoding, speech features, video diffusion sampler."""
