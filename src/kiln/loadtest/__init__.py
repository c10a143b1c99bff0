"""HTTP load testing of any TGI- or OpenAI-compatible server (`kiln bench serve`).

No torch and no engine here: the package talks HTTP only (httpx), counts tokens with the
``tokenizers`` library through :mod:`kiln.text.tokenizer`, and turns streamed responses into
latency, throughput, goodput and cost figures. One job per module:

- ``workload``: what to send (random prompts of exact token counts, files, Dolly, multi-turn)
- ``clients``: one client per wire API (TGI, OpenAI chat, OpenAI completions), streaming
- ``metrics``: per-request records and the summary maths (percentiles, TPOT, ITL, cost)
- ``runner``: load shapes (closed-loop users, constant/Poisson rates, sweeps), warm-up
- ``console``: the Rich live line and summary table; ``results``: the JSON file
- ``report_html`` (with ``svg``): the offline HTML report; ``compare``; ``locust``
"""
