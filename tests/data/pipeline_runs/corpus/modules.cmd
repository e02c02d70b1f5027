find_modules count direct_abs 
