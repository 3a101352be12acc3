"""The contract every algorithm works through (the denoiser and its conditions) and what all layers share."""
