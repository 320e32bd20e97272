"""The zoo tier, text models: transformers BERT, DistilBERT, GPT-2, a MiniLM-shaped sentence
embedder, nn.TransformerEncoder and an LSTM classifier, in every format (tests/zoo.py). The GRU
classifier runs in tests/test_zoo_vision.py: the two files are pytest-xdist's two halves of the
tier, balanced by their measured cost (`python scripts/zoo_table.py --times`)."""

from tests.zoo_cells import make_tests

zoo_results, test_zoo_cell = make_tests(["bert", "distilbert", "gpt2", "minilm", "encoder", "lstm"])
