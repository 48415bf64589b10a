"""Request routing: request cost, replica state, routing policies, backpressure and API keys."""
