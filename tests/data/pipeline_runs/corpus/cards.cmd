python f_render_neuron_cards.py --dataset_path @ROOT@/parcellation_datasets/heldout_corpus_tinybard_tinybard --model_type tinybard --device auto --neurons report --causal_graph 50 
