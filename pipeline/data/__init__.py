"""Data: tokenizers, webdataset shards, classifier tagging and the streaming loader."""
