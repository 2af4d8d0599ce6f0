"""Inference: the generation engine over each model family's decoding state, tensor- and
data-parallel execution, batch prediction over files and distributed evaluation.

    from meshlm.inference.engine import Engine, Request
    from meshlm.inference.sampling import SamplingParams
    from meshlm.inference.loading import find_model_files, load_model

    loaded = load_model(find_model_files(run="runs/tiny-cpu"))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=16)
    ids = loaded.tokenizer.encode("def ").ids
    [out] = engine.generate([Request(ids, SamplingParams(max_new_tokens=32, temperature=0))])
    print(out.text, out.finish_reason)

Modules: engine (scheduling, sampling, streaming), decoding (the family's decode state and
the model copy it runs), linear_ops (prepacked matrix multiplies), sampling, text_stream
(incremental detokenisation, stop strings), loading (model files, TP shards, process
layout), predict, evaluate, commands (the CLI), simple_generate (the full-recompute
reference).

The package imports nothing itself, so that `meshlm --help` does not pay for importing torch.
"""
