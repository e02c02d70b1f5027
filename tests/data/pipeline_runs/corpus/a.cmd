python a_generate_gelu_graph.py --model_type tinybard --output_dir @ROOT@/parcellation_datasets/heldout_corpus_tinybard_tinybard 
