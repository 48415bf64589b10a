"""The native engine backend (`engine.backend: native`): our Llama 4 step loop in plain torch.

`engine.py` (NativeEngine: validate → schedule → forward → sample → detokenize), `serving.py` (it
stepped by `async_engine.py` as a ServingEngine) and the parts only it uses: scheduler, paged KV
cache, runner, sampler, detokenizer, step-rate model, and `hooks.py`, the contracts it asks of the
KV tier and of remote experts.
"""
