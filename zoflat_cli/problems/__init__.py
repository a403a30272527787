"""What is optimised: batched problems (toy, convex) and model problems (encoder and decoder LMs); protocols.py
says what the engine asks of each."""
