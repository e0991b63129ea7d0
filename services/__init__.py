"""Services that run beside Triton and talk to it only through its public APIs: `sd-serve` (serve.py: the
launcher and its supervision, supervisor.py)."""
