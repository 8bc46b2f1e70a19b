"""What the entry points need and the library does not: option checks (options.py), resume (resume.py), run folders
(runs.py), loggers (loggers.py), DDP launch (launch.py), and the pieces of a sample.py run (sample_run.py)."""
