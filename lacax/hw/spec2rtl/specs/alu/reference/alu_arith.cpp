uint8_t alu_arith(uint8_t op, uint8_t a, uint8_t b) {
  switch (op) {
    case 0: return (uint8_t)(a + b);
    case 1: return (uint8_t)(a - b);
    case 5: return (uint8_t)(a << (b & 7));
    case 6: return (uint8_t)(a >> (b & 7));
    case 7: return a < b ? 1 : 0;
    default: return 0;
  }
}
