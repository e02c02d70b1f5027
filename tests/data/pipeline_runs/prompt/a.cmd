python a_generate_gelu_graph.py --model_type tinybard --output_dir @ROOT@/parcellation_datasets/test_1_tinybard 
