"""The offline end-to-end demo behind ``python -m molora_ops demo``; one module per job:

    data       three domains from what Python ships, split train / held-out with no overlap
    tokenizer  byte-level BPE trained locally
    model      the tiny GPT-2 base, token blocks and the seeded training loop
    adapters   one PEFT LoRA per domain and the sequential baseline, saved as PEFT does
    evaluate   held-out losses, router accuracy, traces and timing through mo.patch
    molora     the MoLoRA stage: routers trained through the LM loss, top-k and dense, and their training speed
    plots      the routing heat map
    pipeline   the stages in order, the table and the JSON
"""
