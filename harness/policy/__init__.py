"""Local Hugging Face policies: token-exact sampling, tool-call parsing, tiny test models."""
