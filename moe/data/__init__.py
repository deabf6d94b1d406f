"""Data, floor 2: the tokenizer's corpus and token cache, text and instruction data, synthetic and
folder image-caption data; every data set hands out `Batch`es drawn statelessly by index.

    batches   the Batch every data set returns
    captions  image-caption data (synthetic sets, caption folders), image loading
    corpus    text sources, the tokenizer and token caches, pretraining and instruction data,
              and `prepare_data`, which picks the data set a config asks for
"""
