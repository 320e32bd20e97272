"""The zoo tier, text models: transformers BERT, DistilBERT, GPT-2, a MiniLM-shaped sentence
embedder, nn.TransformerEncoder, LSTM and GRU classifiers, in every format (tests/zoo.py)."""

from tests.zoo_cells import make_tests

zoo_results, test_zoo_cell = make_tests(["bert", "distilbert", "gpt2", "minilm", "encoder", "lstm", "gru"])
