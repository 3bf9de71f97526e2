"""Batch evaluation of cache methods: perplexity, zero-shot multiple choice, memory capacity, reports.

Entry points: ``python -m eval.perplexity``, ``python -m eval.zeroshot``, ``python -m eval.capacity``,
``python -m eval.report``. Data comes from the sha256-pinned shared folder (:mod:`eval.data`). Every score
is measured through the cache method as inference runs it: the model reads K/V back through the method,
from a fresh cache per window or batch. Eviction methods (order dependent, to be evaluated chunk by chunk)
are not part of kvjax yet and get no special handling here.
"""
