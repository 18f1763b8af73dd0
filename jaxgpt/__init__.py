"""jaxgpt: a functional GPT in JAX/Flax, from the tokenizer up."""

__version__ = "0.1.0"
