"""Experiments: one function per paper table or figure, returning tidy results.

``common`` holds what every paper shares (seeded runs, tidy frames, summaries, paired verdicts,
parameter counts, paper-vs-ours tables, the majority-class baseline); one module per paper
(``canet``, ``clpi``, ``lnet``, ``ellg``, ``deepmt``) trains and evaluates the rows of its tables.
A tidy frame has one row per configuration x seed x metric (columns ``config``, ``seed``,
``metric``, ``value``), so a notebook reads its results with pandas instead of re-writing loops.
Submodules are imported by name (``from fundus_lib.experiments import canet``).
"""
