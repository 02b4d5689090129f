uint8_t gcd(uint8_t a, uint8_t b) {
  uint16_t p = (uint16_t)((a << 8) | b);
  for (int i = 0; i < 13; ++i) p = gcd_step(p);
  return (uint8_t)(p >> 8);
}
