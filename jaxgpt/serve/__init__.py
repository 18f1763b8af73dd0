"""An OpenAI-compatible server and its web page (python -m jaxgpt.serve)."""
