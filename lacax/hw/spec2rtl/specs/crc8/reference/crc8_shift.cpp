uint8_t crc8_shift(uint8_t crc) {
  uint8_t s = (uint8_t)(crc << 1);
  if (crc & 0x80) s ^= 0x07;
  return s;
}
