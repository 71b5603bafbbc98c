"""Test helpers for tfemb layers and for layers written against the EmbeddingScheme contract."""

from tfemb.testing.layer_test import build_tiny_model, run_scheme_test
