uint16_t fir8(uint8_t x0, uint8_t x1, uint8_t x2, uint8_t x3, uint8_t x4, uint8_t x5, uint8_t x6, uint8_t x7) {
  uint16_t s0 = preadd(x0, x7), s1 = preadd(x1, x6), s2 = preadd(x2, x5), s3 = preadd(x3, x4);
  return (uint16_t)(s0 + 3 * s1 + 5 * s2 + 7 * s3);
}
