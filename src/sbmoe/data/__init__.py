"""Reading data: BEIR folders (corpus, queries, qrels, splits), ir_datasets exports, the Multi-Domain
collections and training files (Tevatron JSONL, triples, pairs, HF datasets).

Every reader validates line by line and names the file, line and field of a bad record
(:mod:`sbmoe.data.readers` holds the shared JSONL and field readers).
"""
