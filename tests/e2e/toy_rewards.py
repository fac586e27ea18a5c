"""A reward an untrained micro model earns unevenly (so advantages, and gradients, are not all zero)."""


def digit_count(prompts, responses, answers, finished):
    return [sum(ch.isdigit() for ch in response) / 8.0 for response in responses]
