uint16_t crc16_shift(uint16_t crc) {
  uint16_t s = (uint16_t)(crc << 1);
  if (crc & 0x8000) s ^= 0x1021;
  return s;
}
