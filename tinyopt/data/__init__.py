"""Tiny ImageNet from its source to the arrays a sweep reads: fetch, build and verify the cache, the
splits, cached activations.
"""
