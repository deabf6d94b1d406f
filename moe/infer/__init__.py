"""Inference, floor 3: turning a model into text.

    sampling     sampling parameters, next-token sampling, streaming generation with a KV cache
    engine       continuous batching over a fixed number of cache slots
    speculative  speculative decoding: exact rejection sampling, and greedy in lock step for a batch
    prompts      prompts with images, prompt files, text streamed without split characters
    launch       what generate.py runs
"""
