"""What several test files build or check the same way: queues, plans, recorded answers, optimizer
options (factories.py) and the brute-force optimizer oracle (oracles.py)."""
