python f_render_neuron_cards.py --dataset_path @ROOT@/parcellation_datasets/test_1_tinybard --model_type tinybard --device auto --neurons report --causal_graph 50 
