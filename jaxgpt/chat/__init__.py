"""Talking to a model: its chat template, a batch of conversations decoded
together (engine.py), and the terminal chat (python -m jaxgpt.chat)."""
