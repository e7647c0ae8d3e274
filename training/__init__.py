"""Offline training: IMDb reviews -> GloVe-initialised RNN -> a bundle in models/<name>/."""
