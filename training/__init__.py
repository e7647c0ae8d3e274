"""Offline training: IMDb reviews -> GloVe-initialised RNN -> a self-describing bundle in models/."""
