"""A reward a tiny random model earns unevenly (the math reward gives it 0 everywhere, so no gradient):
importable by name, ``--reward engine_rewards:digit_fraction``."""


def digit_fraction(prompt: str, response: str, answer: str) -> float:
    """The fraction of the response's characters that are digits (0 for an empty response)."""
    return sum(c.isdigit() for c in response) / len(response) if response else 0.0
