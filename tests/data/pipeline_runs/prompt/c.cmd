python c_calculate_weighted_activation_graph.py --input_dir @ROOT@/parcellation_datasets/test_1_tinybard 
