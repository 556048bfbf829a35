"""Datasets: the VOC-layout contract every stage reads, the synthetic generator and real-dataset converters."""
