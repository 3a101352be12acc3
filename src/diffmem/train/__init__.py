"""Training-time mitigation of memorization: per-sample losses and the policies applied to them."""
