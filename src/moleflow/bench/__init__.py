"""What `moleflow bench` measures, one module per kind:

    speed.py     training and inference speed, latency, memory and bytes per task (`bench speed`)
    serving.py   a real `moleflow serve` under concurrent clients: throughput and latency (`bench serve`)
    scale.py     how cost grows with the number of products (`bench scale`)
    memory.py    patch-memory size against accuracy and time (`bench memory`)

Studies that are not user commands live in the repository's `benchmarks/` folder, outside the package.
"""
