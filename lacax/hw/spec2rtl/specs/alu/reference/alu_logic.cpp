uint8_t alu_logic(uint8_t op, uint8_t a, uint8_t b) {
  switch (op) {
    case 2: return a & b;
    case 3: return a | b;
    case 4: return a ^ b;
    default: return 0;
  }
}
