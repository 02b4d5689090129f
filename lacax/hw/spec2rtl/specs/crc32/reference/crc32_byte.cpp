uint32_t crc32_byte(uint32_t crc, uint8_t data) {
  uint32_t c = crc ^ (uint32_t)data;
  for (int i = 0; i < 8; ++i) c = crc32_shift(c);
  return c;
}
