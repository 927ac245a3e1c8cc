"""LLM side: providers behind one streaming interface (and, later, modes,
context budgeting, guardrails and extraction). Knows nothing of sockets."""
