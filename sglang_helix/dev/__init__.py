"""Development harness (the `dev` extra: transformers, tokenizers): local CPU ranks' paged caches
(`paged`), real SGLang servers on CPU (`server`), a PD deployment on one machine (`pd`) and tiny
random-weight models built locally (`tiny_models`). Import the submodules you need."""
