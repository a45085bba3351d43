"""The input pipeline: shards -> pure numpy transforms -> Ray Data -> the ratio-mixed stream in each worker.

Driver: ``tokenizer.load_or_train_tokenizer``, ``mixing.validate_ratios``, ``datasets.build_train_data``.
Worker: ``stream.MixedStream(spec)``, ``stream.to_torch``,
``validation.held_out_batches`` / ``validation.retrieval_pairs``.
"""
